"""Shared core of the online RLHF service: config, event bus, local Kafka, server runtime,
model loading and the checkpoint registry. Generated protobuf code lives in ``rlhf.v1``."""

__version__ = "0.1.0"
