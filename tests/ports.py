"""Free loopback ports for servers the tests start (other Ray instances and servers share this machine)."""
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
