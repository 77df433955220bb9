"""Downstream evaluation configs: <dataset>_<protocol>.py."""
