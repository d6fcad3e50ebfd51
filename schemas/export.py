"""Write the JSON Schema files for the contract: `python -m schemas.export` (or `make schemas`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import TypeAdapter

from schemas.control import ControlMessage
from schemas.events import UsageEvent

OUT = Path(__file__).parent / "jsonschema"


def documents() -> dict[str, str]:
    docs = {
        "usage_event.v1.json": UsageEvent.model_json_schema(),
        "control_message.v1.json": TypeAdapter(ControlMessage).json_schema(),
    }
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in docs.items()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in documents().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
