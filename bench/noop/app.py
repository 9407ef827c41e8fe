"""No-op function: measures the platform, not the handler."""


def handler(event: object, context: object) -> dict[str, bool]:
    return {"ok": True}
