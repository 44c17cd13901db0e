"""Sans-I/O codecs: bytes in, messages out, and back. No sockets, no asyncio."""
