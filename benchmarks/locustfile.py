"""Locust users for `python -m benchmarks.load`. Locust runs this file in its own process (it
patches the standard library with gevent); pytest never collects it.

Closed loop: each user sends its next request as soon as the last one is answered.
    LOAD_PROFILE=predict  POST /predict only
    LOAD_PROFILE=mixed    8 predictions : 1 correction of one of them (/feedback) : 1 read of /model
The API key comes in LOAD_API_KEY_FILE, the photos from LOAD_IMAGES (a folder of JPEGs).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from typing import ClassVar

from locust import FastHttpUser, constant, task

BOUNDARY = "insect-load-boundary"
KEY = Path(os.environ["LOAD_API_KEY_FILE"]).read_text().strip()
PHOTOS = [path.read_bytes() for path in sorted(Path(os.environ["LOAD_IMAGES"]).glob("*.jpg"))]
MIXED = os.environ.get("LOAD_PROFILE", "predict") == "mixed"


def multipart(fields: dict[str, str], image: bytes | None = None) -> bytes:
    """A multipart/form-data body, built once per request without a client library's overhead."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if image is not None:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="bug.jpg"\r\n'
        parts.append(head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


BODIES = [multipart({}, photo) for photo in PHOTOS]


class ServiceUser(FastHttpUser):
    wait_time = constant(0)
    headers: ClassVar = {"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def on_start(self) -> None:
        self.classes = self.client.post("/model", json={}, headers=self.headers | {"Content-Type": "application/json"}).json()[
            "classes"
        ]

    @task(8)
    def predict(self) -> None:
        with self.client.post("/predict", data=random.choice(BODIES), headers=self.headers, catch_response=True) as response:
            if response.status_code == 200:
                self.last_prediction = response.json()["prediction_id"]

    @task(1 if MIXED else 0)
    def correct(self) -> None:
        prediction = getattr(self, "last_prediction", None)
        if not prediction:
            return
        body = multipart({"prediction_id": prediction, "corrected_label": random.choice(self.classes)})
        self.client.post("/feedback", data=body, headers=self.headers | {"Idempotency-Key": str(uuid.uuid4())})

    @task(1 if MIXED else 0)
    def read_model(self) -> None:
        self.client.post("/model", data=json.dumps({}), headers=self.headers | {"Content-Type": "application/json"})
