"""kombu's Amazon SQS transport, made safe against malformed messages.

kombu reads each SQS message body as JSON and wraps what is not a kombu envelope; a body
that is JSON but not a valid envelope (``{"properties": 3}``) raised inside the consumer's
callback chain and stalled the worker's consuming for good. Here any message kombu cannot
turn into an envelope is handed over as a refused stand-in (shared/envelope.py), which the
worker dead-letters and acks, deleting it from SQS. Everything else is kombu's transport:
long polling, visibility timeout, deletes on ack. Design notes: docs/ops.md ("Amazon SQS").
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import SQS

from shared.envelope import is_message, stand_in

logger = logging.getLogger(__name__)


class Channel(SQS.Channel):
    def _message_to_python(self, message: dict[str, Any], queue_name: str, q_url: str
                           ) -> dict[str, Any]:
        raw = message.get("Body") or ""
        try:
            payload: dict[str, Any] = super()._message_to_python(message, queue_name, q_url)
            if is_message(payload):
                return payload
            reason = "not a kombu message (its envelope has the wrong shape)"
        except Exception as exc:  # kombu's decoding raises many kinds
            reason = f"kombu cannot read the message: {type(exc).__name__}: {exc}"
        logger.error("queue %s: refused a message of %d bytes: %s", queue_name, len(raw),
                     reason)
        refused = stand_in(reason, len(raw), {"delivery_info": {}})
        return dict(self._envelope_payload(refused, "", message, q_url))


class Transport(SQS.Transport):
    Channel = Channel
