"""WebSocket transports: the seam between bytes on a socket and Kefu sessions."""
