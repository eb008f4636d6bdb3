"""The feedback gateway: K-way rankings and demonstrations into Kafka, validated, exactly once.

server.py       FeedbackService servicer and ``rlhf serve feedback``
importer.py     ``rlhf feedback import FILE`` (JSONL, through the same pipeline)
gateway.py      the pipeline: validate, resolve generation ids, redact, split, store once
validate.py     the request rules, one precise INVALID_ARGUMENT message each
store_health.py whether events can be stored now (the health condition ``kafka``)
generations.py  generation id -> served sample index (fed from rlhf.prompts)
dedupe.py       stored event ids, and the dedupe rule consumers apply
tail.py         reading a topic's history and following it (supervised)
outbox.py       asyncio <-> kafka-python hand-off with batched thread hops
formats.py      import formats: own JSON, HH-RLHF pairs, UltraFeedback ratings
config.py       typed, frozen configuration
"""
