"""A round of users against the running service, as `make demo` plays it: photograph insects in
the field (freshly drawn, on soil and sand in dim light: unlike the lab photos the model trained
on), ask /predict, and tell /feedback the right species for every answer (a correction where
the model was wrong, a confirmation where it was right). Prints the model's field top-1.

    python scripts/feedback_round.py --key-file KEY [--url http://127.0.0.1:3000] [--photos 200] [--domain lab]

With a labeler's key the corrections train the next model; with a client's they are suggestions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import bentoml
import typer

from config import get_settings
from ml.data.synthetic import Domain, user_photos


def main(
    key_file: Annotated[Path, typer.Option(help="a file holding the API key the users send")],
    url: Annotated[str | None, typer.Option(help="service URL")] = None,
    photos: Annotated[int, typer.Option(help="how many photos the users send")] = 200,
    domain: Annotated[Domain, typer.Option(help="field: where users photograph; lab: like the training set")] = "field",
    seed: Annotated[int, typer.Option(help="draws photos unlike the dataset's (seed 0)")] = 2026,
) -> None:
    settings = get_settings()
    url = url or f"http://127.0.0.1:{settings.serve.port}"
    num_classes, size = settings.synthetic.num_classes, settings.synthetic.image_size
    corrected = 0
    token = key_file.read_text().strip()
    with bentoml.SyncHTTPClient(url, timeout=120, token=token) as client, tempfile.TemporaryDirectory() as tmp:
        classes = client.model()["classes"]
        for i, (image, truth) in enumerate(user_photos(num_classes, photos, size, seed, domain)):
            photo = Path(tmp) / f"photo_{i}.jpg"
            image.save(photo, quality=90)
            answer = client.predict(image=photo)
            receipt = client.feedback(
                prediction_id=answer["prediction_id"], corrected_label=classes[truth], user_id=f"demo-user-{i % 3}"
            )
            wrong = answer["species"] != classes[truth]
            corrected += wrong
            if i < 12:  # the first few in full; the rest are counted
                typer.echo(
                    f"photo {i:3d}: model v{answer['model']['version']} ({answer['model']['backend']}) said "
                    f"{answer['species']!r} p={answer['probability']:.2f} -> {receipt['kind']} {receipt['feedback_id']} "
                    f"{'CORRECTED to ' + repr(classes[truth]) if wrong else 'confirmed'}"
                )
    typer.echo(
        f"{photos} {domain} photos: {corrected} corrected, {photos - corrected} confirmed; "
        f"the served model's {domain} top-1 {(photos - corrected) / photos:.3f}"
    )


if __name__ == "__main__":
    typer.run(main)
