"""The `trt-dm` command: its parser, the settings it builds from arguments, one function per command."""
