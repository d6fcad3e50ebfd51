"""Create Tollway's topics if they are missing (idempotent; safe on every start)."""

from __future__ import annotations

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.control import ALERTS_TOPIC, CONTROL_TOPIC
from schemas.events import DLQ_TOPIC, USAGE_TOPIC

log = structlog.get_logger("tollway.topics")


def topic_plan(usage_partitions: int) -> dict[str, int]:
    # Control is one partition: every proxy must see its messages in the order billing sent them.
    return {USAGE_TOPIC: usage_partitions, DLQ_TOPIC: 1, CONTROL_TOPIC: 1, ALERTS_TOPIC: 1}


async def ensure_topics(bootstrap: str, usage_partitions: int = 4) -> None:
    await create_missing(bootstrap, topic_plan(usage_partitions))


async def create_missing(bootstrap: str, plan: dict[str, int]) -> None:
    """Create each topic of `plan` (name -> partitions) that does not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=n, replication_factor=1) for name, n in plan.items() if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # a concurrent starter won the race: the topic is there, which is all we need
            log.info("topics_created", topics=[t.name for t in wanted])
    finally:
        await admin.close()
