"""Scaling: ``storms plan`` (the resource planner), ``storms study`` (throughput / pipeline studies) and their report."""
