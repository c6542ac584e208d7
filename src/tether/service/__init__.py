"""The FastAPI service: REST, WebSocket and the dashboard."""
