"""Feedback images, addressed by content hash: in an S3 bucket (boto3) when one is configured,
otherwise as files under the data directory. Storing the same image twice is a no-op."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Protocol

from config import Settings


def image_key(prefix: str, sha256: str, suffix: str) -> str:
    return f"{prefix}/{sha256[:2]}/{sha256}{suffix}"


class ImageStore(Protocol):
    location: str

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...  # None: no such image (an outage raises)

    def check(self) -> None: ...  # raises when the store does not answer


class S3ImageStore:
    def __init__(self, bucket: str, endpoint_url: str | None = None, timeout_s: float = 5.0):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.location = f"s3://{bucket}"
        # bounded: an unreachable store fails within about twice timeout_s, one retry included
        bounded = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"mode": "standard", "max_attempts": 2})
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, config=bounded)

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._s3.create_bucket(Bucket=self.bucket)

    def check(self) -> None:
        self._s3.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise


class LocalImageStore:
    def __init__(self, root: Path):
        self.root = root
        self.location = root.as_uri()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own per write: two uploads of one image at once must not share a file
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        partial.write_bytes(data)
        partial.replace(path)  # atomic: a crash never leaves a truncated image under the key

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)  # what the first `put` does: raises where it could not

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None


def image_store(settings: Settings, create_bucket: bool = True) -> ImageStore:
    """The configured store; its S3 bucket created when missing, unless `create_bucket` is off
    (the service: it starts while S3 is down, and a deploy creates the bucket)."""
    cfg = settings.feedback
    if cfg.s3_bucket:
        store = S3ImageStore(cfg.s3_bucket, cfg.s3_endpoint_url or None, cfg.storage_timeout_s)
        if create_bucket:
            store.ensure_bucket()
        return store
    return LocalImageStore(settings.image_store_dir)
