"""Real-time speech job scheduler daemon (Trio, WebSocket, Redis/Valkey + Lua)."""

__version__ = "0.1.0"
