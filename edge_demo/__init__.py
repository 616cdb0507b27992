"""The demo: ``python -m edge_demo`` (``make demo``) runs the three services on this machine.

See edge_demo.cli for what it shows; edge_demo.csi_live is the part that runs in the
real-kernel guest when this kernel has no device-mapper.
"""
