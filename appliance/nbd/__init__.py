"""NBD: the protocol (sans-IO, protocol.py), the transmission loop (_fast/transmit.pyx)
and the socket server (server.py) that joins them."""
