"""memcgscope: the memory-cgroup charge path, observed and modelled."""

__version__ = "0.1.0"
