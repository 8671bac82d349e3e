"""exaconnect: a connectomics pipeline (EM sections in, reconstructed neurons out) for exascale machines."""

__version__ = "0.1.0"
