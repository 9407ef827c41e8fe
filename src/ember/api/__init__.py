"""The Lambda API as clients see it: the HTTP frontend, the control plane behind it, SigV4 authentication,
Lambda-shaped errors and the OpenAPI document."""
