"""The edge: WebSocket endpoints for clients (``/v1/session``) and worker nodes (``/v1/node``),
frame size and rate limits. Parses wire frames into typed messages and hands them inward."""
