"""ember's sample function: greets whoever the event names."""

import os


def handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"hello from {context.function_name} ({os.environ.get('AWS_LAMBDA_FUNCTION_MEMORY_SIZE')} MB)")
    return {"message": f"Hello, {name}!", "request_id": context.aws_request_id}
