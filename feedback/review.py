"""The labelers' review queue: clients' suggestions and the model's unsure predictions, most
informative first, each held by one labeler at a time.

Order: suggestions first (a person said the model was wrong), then by the drift watch's score
(least like the training set first), then by the model's probability (least sure first), then
newest first. A
labeler claims the first item nobody holds: an upsert that only takes an item whose claim is
free, expired or already theirs, so two labelers asking at once get two different items. A claim
lapses after `hold_s`; a decision is made once, however often it is posted.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from feedback.db import LABEL, SUGGESTION, drift_scores, predictions, review_claims
from feedback.db import feedback as feedback_rows

CONFIRMED, CORRECTED = "confirmed", "corrected"
REJECTIONS = {"not-an-insect": "not an insect", "unusable": "unusable photo"}


def _queue(unsure_below: float) -> sa.Subquery:
    """Every reviewable item: key, image, the model's label and probability, the suggestion."""
    f, p, d = feedback_rows, predictions, drift_scores
    suggestions = (
        sa.select(
            (sa.literal("s:") + sa.cast(f.c.id, sa.Text)).label("key"),
            f.c.image_key,
            f.c.image_sha256,
            f.c.prediction_id,
            f.c.predicted_label.label("model_label"),
            p.c.probability,
            f.c.corrected_label.label("suggestion"),
            f.c.created_at,
            d.c.witness,
            sa.literal(1).label("suggested"),
        )
        .select_from(f.outerjoin(p, p.c.id == f.c.prediction_id).outerjoin(d, d.c.prediction_id == f.c.prediction_id))
        .where(f.c.kind == SUGGESTION, f.c.export_id.is_(None), f.c.quarantine_reason.is_(None))
    )
    unsure = (
        sa.select(
            (sa.literal("p:") + p.c.id).label("key"),
            p.c.image_key,
            p.c.image_sha256,
            p.c.id.label("prediction_id"),
            p.c.label.label("model_label"),
            p.c.probability,
            sa.null().label("suggestion"),
            p.c.created_at,
            d.c.witness,
            sa.literal(0).label("suggested"),
        )
        .select_from(p.outerjoin(d, d.c.prediction_id == p.c.id))
        .where(p.c.probability < unsure_below, ~sa.exists().where(f.c.prediction_id == p.c.id))
    )
    return sa.union_all(suggestions, unsure).subquery("queue")


def _open_items(unsure_below: float, labeler: str) -> sa.Select:
    """Items not decided and not held by another labeler, the labeler's own claim first."""
    queue, claims = _queue(unsure_below), review_claims
    free = sa.or_(claims.c.item.is_(None), claims.c.claimed_until < sa.func.now(), claims.c.claimed_by == labeler)
    return (
        sa.select(queue)
        .outerjoin(claims, claims.c.item == queue.c.key)
        .where(claims.c.decided_at.is_(None), free)
        .order_by(
            (claims.c.claimed_by == labeler).desc().nulls_last(),
            queue.c.suggested.desc(),
            queue.c.witness.desc().nulls_last(),
            queue.c.probability.asc().nulls_last(),
            queue.c.created_at.desc(),
        )
    )


def claim_next(db: sa.Engine, labeler: str, unsure_below: float, hold_s: float) -> sa.Row | None:
    """The item this labeler should look at now, held for them for `hold_s`; None when the
    queue is empty."""
    claims = review_claims
    with db.begin() as conn:
        for item in conn.execute(_open_items(unsure_below, labeler).limit(20)):
            take = postgresql.insert(claims).values(
                item=item.key, claimed_by=labeler, claimed_until=sa.func.now() + timedelta(seconds=hold_s)
            )
            take = take.on_conflict_do_update(
                index_elements=["item"],
                set_={"claimed_by": labeler, "claimed_until": take.excluded.claimed_until},
                where=sa.and_(
                    claims.c.decided_at.is_(None), sa.or_(claims.c.claimed_until < sa.func.now(), claims.c.claimed_by == labeler)
                ),
            )
            if conn.execute(take).rowcount == 1:
                return item
    return None


def decide(db: sa.Engine, key: str, labeler: str, decision: str, species: str | None = None) -> str:
    """Record a labeler's decision on an item they hold: confirmed or corrected (a label row that
    trains the next model), or rejected (a suggestion is quarantined with why). A decision posted
    again is a no-op; returns the decision recorded."""
    with db.begin() as conn:
        claim = conn.execute(sa.select(review_claims).where(review_claims.c.item == key).with_for_update()).first()
        if claim is None or claim.claimed_by != labeler:
            raise PermissionError("this item is not held by you (its hold lapsed and another labeler took it)")
        if claim.decided_at is not None:
            return claim.decision
        queue = _queue(unsure_below=1.0)  # held items stay reviewable, however sure the model was
        item = conn.execute(sa.select(queue).where(queue.c.key == key)).first()
        if decision in (CONFIRMED, CORRECTED):
            conn.execute(
                feedback_rows.insert().values(
                    image_sha256=item.image_sha256,
                    image_key=item.image_key,
                    prediction_id=item.prediction_id,
                    predicted_label=item.model_label,
                    corrected_label=species,
                    user_id=labeler,
                    kind=LABEL,
                    submitted_by=labeler,
                )
            )
        elif key.startswith("s:"):
            reason = f"rejected by {labeler}: {REJECTIONS[decision]}"
            conn.execute(feedback_rows.update().where(feedback_rows.c.id == int(key[2:])).values(quarantine_reason=reason))
        recorded = decision if decision in (CONFIRMED, CORRECTED) else f"rejected: {REJECTIONS[decision]}"
        conn.execute(
            review_claims.update().where(review_claims.c.item == key).values(decided_at=sa.func.now(), decision=recorded)
        )
    return recorded


def progress(db: sa.Engine, labeler: str, unsure_below: float) -> tuple[int, int]:
    """(items this labeler decided today, items left for anyone)."""
    today = sa.func.date_trunc("day", sa.func.now())
    done = sa.select(sa.func.count()).where(review_claims.c.claimed_by == labeler, review_claims.c.decided_at >= today)
    left = sa.select(sa.func.count()).select_from(_open_items(unsure_below, labeler).order_by(None).subquery())
    with db.connect() as conn:
        return conn.execute(done).scalar_one(), conn.execute(left).scalar_one()


def image_key(db: sa.Engine, key: str) -> str | None:
    """The stored image of a queue item (None for a key the queue does not hold)."""
    queue = _queue(unsure_below=1.0)
    with db.connect() as conn:
        return conn.execute(sa.select(queue.c.image_key).where(queue.c.key == key)).scalar()
