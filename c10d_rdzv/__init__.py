"""A rendezvous backend for torchrun over a c10d ``Store`` (``TCPStore`` or ``FileStore``).

Nothing is imported here: torch loads ``c10d_rdzv.plugin`` while its rendezvous package is still
initialising, so this package must not pull torch's rendezvous modules in on import.
"""
