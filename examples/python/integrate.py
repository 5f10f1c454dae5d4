"""Integrating with costmesh from Python, with nothing but nats-py.

1. Publishes GPU telemetry as a JSON event (the proto3 JSON mapping of
   costmesh.v1.GpuSample), the way a third-party exporter would.
2. Waits for the budget events the cost-watcher publishes when the energy
   it books crosses the monthly budget, and prints them.

Run against a mesh whose services publish JSON (`[mesh] content_type =
"json"`; protobuf consumers need the generated classes from proto/):

    NATS_URL=nats://127.0.0.1:4222 COSTMESH_PREFIX=costmesh python integrate.py

Exits 0 once an EXCEEDED budget event has arrived, 1 after TIMEOUT_S seconds.
"""
import asyncio
import datetime
import json
import os
import sys
import uuid

import nats

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
PREFIX = os.environ.get("COSTMESH_PREFIX", "costmesh")
NODE = os.environ.get("NODE", "py-exporter")
TIMEOUT_S = float(os.environ.get("TIMEOUT_S", "30"))


def headers(event_type: str) -> dict:
    """The CloudEvents headers every costmesh event carries (docs/subjects.md)."""
    event_id = str(uuid.uuid4())
    return {
        "ce-id": event_id,
        "Nats-Msg-Id": event_id,
        "ce-type": event_type,
        "ce-source": f"python/{NODE}",
        "ce-time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "ce-specversion": "1.0",
        "content-type": "application/json",
    }


def sample(energy_mj: int) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({
        "node": NODE,
        "gpuIndex": 0,
        "uuid": "GPU-python-0",
        "model": "RTX 4090",
        "bootId": "py-boot-1",
        "time": now,
        "powerDrawMw": 300000,
        "energyMj": str(energy_mj),  # uint64 is a string in proto3 JSON
        "utilizationGpuPct": 90,
    }).encode()


async def main() -> int:
    nc = await nats.connect(NATS_URL)
    budget_events = asyncio.Queue()

    async def on_budget(msg):
        await budget_events.put(msg)

    # Budget events are JetStream subjects; a plain subscription sees them live.
    await nc.subscribe(f"{PREFIX}.budget.>", cb=on_budget)
    await nc.flush()

    subject = f"{PREFIX}.telemetry.gpu.{NODE}.0"
    # Two readings of a cumulative energy counter, 5 kWh apart
    # (1 kWh = 3.6e9 mJ): the cost-watcher books the difference.
    for energy in (1_000_000, 1_000_000 + 5 * 3_600_000_000):
        await nc.publish(subject, sample(energy), headers=headers("costmesh.v1.GpuSample"))
    await nc.flush()
    print(f"published 2 GpuSample events on {subject}")

    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            print("no EXCEEDED budget event in time", file=sys.stderr)
            return 1
        try:
            msg = await asyncio.wait_for(budget_events.get(), timeout=left)
        except asyncio.TimeoutError:
            continue
        event = json.loads(msg.data)
        print(f"{msg.subject}: {event.get('scope')} {event.get('state')} - {event.get('reason', '')}")
        if event.get("state") == "BUDGET_STATE_EXCEEDED":
            await nc.drain()
            return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
