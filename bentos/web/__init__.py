"""The web app for people, served by the Bento under /app: sign in with an API key, identify an
insect from a photo and correct the answer, see what became of one's corrections; labelers
review suggestions and unsure predictions; admins promote and roll back models.

Server-rendered (FastAPI + Jinja2); no JavaScript needed (one inline script previews the chosen
photo): every page works with a keyboard and on a phone (the file input opens the camera). A
session is a signed, HttpOnly, SameSite=Strict cookie holding the key's sha256, never the key;
the service's `ApiKeys` middleware checks that key on every request before its body is read, and
counts it against the key's rate limit, so a revoked key ends its sessions and a page without a
session goes to the sign-in form (and back after it). Every form
carries the session's CSRF token. The pages call the same service methods as the API
(`identify`, `correct`), so they refuse what it refuses, with the same statuses.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from typing import Annotated

import mlflow
from bentoml.exceptions import BentoMLException
from fastapi import APIRouter, Depends, FastAPI, Form, Request, UploadFile
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, TimestampSigner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import cookie_parser

from bentos.guards import header
from config import Settings, get_settings
from config.private import write_private
from feedback import db, review
from feedback.keys import Caller, caller_for, key_digest
from registry import all_versions, gate_summary, promote, rollback

HERE = Path(__file__).parent
PREFIX = "/app"  # where the Bento mounts the app
SESSION_HOURS = 8
SESSION_COOKIE = "insect_session"
# MLflow calls (the models page, promotion) run here, never on the threads that decode uploads
REGISTRY_THREADS = ThreadPoolExecutor(2, thread_name_prefix="registry")
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter()


class PageError(Exception):
    """A refusal shown as a page, with its status."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def session_secret(path: Path) -> str:
    """The key that signs session cookies: made at the first start and shared by every worker
    (written under a name of its own, then linked into place: two workers starting at once end
    up with the same one)."""
    if not path.exists():
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        write_private(partial, secrets.token_urlsafe(32))
        try:
            os.link(partial, path)
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_text().strip()


def session_secret_path(settings: Settings) -> Path:
    return settings.data_dir / "keys" / "web-session.secret"


@cache
def _session_signer() -> TimestampSigner:
    return TimestampSigner(session_secret(session_secret_path(get_settings())))


def session_digest(scope) -> str | None:
    """The sha256 of the key a request's session signed in with, read from its cookie as
    Starlette's SessionMiddleware signs it; None without a cookie, for a session that has not
    signed in, and for a cookie that is forged or older than SESSION_HOURS. No I/O."""
    cookie = cookie_parser(header(scope, b"cookie") or "").get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        session = json.loads(base64.b64decode(_session_signer().unsign(cookie.encode(), max_age=SESSION_HOURS * 3600)))
    except (BadSignature, ValueError):
        return None
    digest = session.get("key") if isinstance(session, dict) else None
    return digest if isinstance(digest, str) else None


async def registry_call(request: Request, fn, *args):
    """`fn(*args)`, an MLflow call, on the registry's threads, bounded in time: a registry that
    does not answer is a 503 page, and holds no thread another request needs."""
    call = asyncio.get_running_loop().run_in_executor(REGISTRY_THREADS, partial(fn, *args))
    try:
        return await asyncio.wait_for(call, request.app.state.serve.registry_timeout_s * 2)
    except TimeoutError as error:
        raise PageError(503, "The model registry does not answer now. Try again in a minute.") from error


def build_app() -> FastAPI:
    """The app's routes and files; `attach` gives it the service and its settings at start."""
    app = FastAPI(title="Insect classifier web app", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
    app.add_exception_handler(PageError, lambda request, error: page(request, "error.html", error.status, message=error.message))
    app.add_exception_handler(
        BentoMLException, lambda request, error: page(request, "error.html", int(error.error_code), message=str(error))
    )
    return app


def attach(app: FastAPI, settings: Settings, service) -> None:
    """Give the app the service whose methods it calls (`identify`, `correct`, `storage`, `db`)
    and the session cookies' signing key, kept under the data directory."""
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(session_secret_path(settings)),
        session_cookie=SESSION_COOKIE,
        path=PREFIX,
        max_age=SESSION_HOURS * 3600,
        same_site="strict",
        https_only=settings.serve.host not in ("127.0.0.1", "localhost"),  # plain HTTP only on this machine
    )
    app.state.service, app.state.serve, app.state.model_name = service, settings.serve, settings.registered_model_name


def page(request: Request, template: str, status: int = 200, **context) -> Response:
    """A rendered page, with the CSRF token its forms carry (a session gets one on first sight)."""
    csrf = request.session.setdefault("csrf", secrets.token_urlsafe(32))
    caller = getattr(request.state, "caller", None)
    return templates.TemplateResponse(
        request, template, {"prefix": PREFIX, "csrf": csrf, "caller": caller, **context}, status_code=status
    )


async def check_csrf(request: Request) -> None:
    """Every form post carries the session's token; a post without it (another site's form, an
    expired session) is refused."""
    sent = (await request.form()).get("csrf", "")
    expected = request.session.get("csrf", "")
    if not expected or not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
        raise PageError(403, "This form has expired or did not come from this site. Reload the page and send it again.")


async def signed_in(request: Request) -> Caller:
    """The session's caller, as the ApiKeys middleware found it before the body was read."""
    caller = getattr(request.state, "caller", None)
    if caller is None:
        raise PageError(401, "Sign in with your API key first.")
    return caller


def role(needed: str):
    async def dependency(caller: Annotated[Caller, Depends(signed_in)]) -> Caller:
        if not caller.may_act_as(needed):
            raise PageError(403, f"This page is for a {needed} key; yours is a {caller.role} key.")
        return caller

    return dependency


Client = Annotated[Caller, Depends(role("client"))]
Labeler = Annotated[Caller, Depends(role("labeler"))]
Admin = Annotated[Caller, Depends(role("admin"))]
Csrf = Depends(check_csrf)


def back_to(next_page: str) -> str:
    """Where sign-in leads: the page asked for, when it is one of this app's, else its front page."""
    inside = next_page.startswith(f"{PREFIX}/") and not next_page.startswith(f"{PREFIX}//") and "\\" not in next_page
    return next_page if inside else f"{PREFIX}/"


@router.get("/sign-in")
async def sign_in_page(request: Request, next: str = f"{PREFIX}/") -> Response:
    return page(request, "sign_in.html", next=back_to(next))


@router.post("/sign-in", dependencies=[Csrf])
async def sign_in(
    request: Request, api_key: Annotated[str, Form(max_length=200)], next: Annotated[str, Form(max_length=2000)] = f"{PREFIX}/"
) -> Response:
    caller = await request.app.state.service.storage(caller_for, request.app.state.service.db, api_key.strip())
    if caller is None:
        return page(request, "sign_in.html", 401, message="That key is unknown or revoked.", next=back_to(next))
    request.session.clear()  # a new session: a new CSRF token too
    request.session["key"] = key_digest(api_key.strip())
    return RedirectResponse(back_to(next), status_code=303)


@router.post("/sign-out", dependencies=[Csrf])
async def sign_out(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)


@router.get("/")
async def identify_page(request: Request, caller: Client) -> Response:
    return page(request, "identify.html")


@router.post("/identify", dependencies=[Csrf])
async def identify(request: Request, caller: Client, image: UploadFile) -> Response:
    service, data = request.app.state.service, await image.read()
    answer = await service.identify(data, top_k=5)
    unsure = answer.probability < request.app.state.serve.unsure_below
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"  # identify accepted it: one of the two
    photo = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"  # shown back from the request itself
    return page(request, "identify.html", answer=answer, unsure=unsure, photo=photo, classes=service._model().model.classes)


@router.post("/correct", dependencies=[Csrf])
async def correct(
    request: Request, caller: Client, prediction_id: Annotated[str, Form()], species: Annotated[str, Form()]
) -> Response:
    receipt = await request.app.state.service.correct(caller, species, prediction_id=prediction_id, user_id=caller.name)
    return page(request, "corrected.html", species=species, receipt=receipt)


def _trained_in(name: str) -> dict[str, list[str]]:
    """Dataset version directory -> the model versions trained on it."""
    trained: dict[str, list[str]] = {}
    for version in all_versions(name):
        trained.setdefault(version.tags.get("dataset_dir", ""), []).append(version.version)
    return trained


@router.get("/history")
async def history(request: Request, caller: Client) -> Response:
    state = request.app.state
    rows = await state.service.storage(db.feedback_sent_by, state.service.db, caller.name)
    trained = await registry_call(request, _trained_in, state.model_name) if any(row.dataset_dir for row in rows) else {}
    return page(request, "history.html", rows=rows, trained=trained)


@router.get("/review")
async def review_page(request: Request, caller: Labeler) -> Response:
    service, serve = request.app.state.service, request.app.state.serve
    item = await service.storage(review.claim_next, service.db, caller.name, serve.unsure_below, serve.review_hold_s)
    done, left = await service.storage(review.progress, service.db, caller.name, serve.unsure_below)
    image = item and await service.storage(service.images.get, item.image_key)
    top = (await service.rank_species(image, top_k=5))[3] if image else []  # what the served model says now
    classes = service._model().model.classes
    return page(request, "review.html", item=item, top=top, done=done, left=left, classes=classes)


@router.get("/review/image")
async def review_image(request: Request, caller: Labeler, item: str) -> Response:
    service = request.app.state.service
    key = await service.storage(review.image_key, service.db, item)
    data = key and await service.storage(service.images.get, key)
    if not data:
        raise PageError(404, f"No image for review item {item!r}.")
    return Response(data, media_type="image/png" if data.startswith(b"\x89PNG") else "image/jpeg")


@router.post("/review/decide", dependencies=[Csrf])
async def review_decide(
    request: Request,
    caller: Labeler,
    item: Annotated[str, Form()],
    decision: Annotated[str, Form()],
    species: Annotated[str | None, Form()] = None,
) -> Response:
    service = request.app.state.service
    if decision not in (review.CONFIRMED, review.CORRECTED, *review.REJECTIONS):
        raise PageError(400, f"Unknown decision {decision!r}.")
    if decision in (review.CONFIRMED, review.CORRECTED) and species not in service._model().model.classes:
        raise PageError(422, f"Unknown species {species!r}: choose one from the list.")
    try:
        await service.storage(review.decide, service.db, item, caller.name, decision, species)
    except PermissionError as error:
        raise PageError(409, f"{error}. The next item is waiting.") from error
    return RedirectResponse(f"{PREFIX}/review", status_code=303)


def _version_rows(name: str, db_engine) -> list[dict]:
    """What the models page shows of each version, newest first (MLflow calls: run in a thread)."""
    rows = []
    for version in reversed(all_versions(name)):
        metrics = mlflow.get_run(version.run_id).data.metrics
        dataset_dir = version.tags.get("dataset_dir", "")
        artifacts = MlflowClient().list_artifacts(version.run_id, "evaluation")
        rows.append(
            {
                "version": version.version,
                "aliases": version.aliases,
                "scores": {key: metrics[key] for key in ("lab_top1", "field_top1", "lab_macro_f1") if key in metrics},
                "dataset": Path(dataset_dir).name or "?",
                "feedback": db.feedback_in_dataset(db_engine, dataset_dir),
                "gate": gate_summary(version),
                "slices": [Path(a.path).stem.removeprefix("confusion_matrix_") for a in artifacts if a.path.endswith(".png")],
            }
        )
    return rows


@router.get("/models")
async def models_page(request: Request, caller: Labeler, promoted: int | None = None, restored: int | None = None) -> Response:
    state = request.app.state
    rows = await registry_call(request, _version_rows, state.model_name, state.service.db)
    context = {"rows": rows, "name": state.model_name, "serve": state.serve, "promoted": promoted, "restored": restored}
    return page(request, "models.html", **context)


@router.get("/models/{version}/confusion/{slice_name}.png")
async def confusion_matrix(request: Request, caller: Labeler, version: int, slice_name: str) -> Response:
    def download() -> bytes:
        run_id = MlflowClient().get_model_version(request.app.state.model_name, str(version)).run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"evaluation/confusion_matrix_{slice_name}.png", dst_path=tmp
            )
            return Path(path).read_bytes()

    try:
        return Response(await registry_call(request, download), media_type="image/png")
    except MlflowException as error:
        raise PageError(404, f"No confusion matrix for version {version} on {slice_name!r}.") from error


def registry_refusal(error: MlflowException, otherwise: str) -> PageError:
    """The page for an alias move the registry refused: a service whose MLflow login may only
    read (as in `make up`) sends people to the MLflow UI, where their own login decides."""
    if error.error_code == "PERMISSION_DENIED":
        return PageError(403, "This service may only read the registry: promote in the MLflow UI, signed in as a reviewer.")
    return PageError(404, otherwise)


@router.post("/models/promote", dependencies=[Csrf])
async def promote_version(
    request: Request, caller: Admin, version: Annotated[int, Form()], sure: Annotated[bool, Form()] = False
) -> Response:
    if not sure:
        raise PageError(400, "Tick the box to confirm: the Bento serves the new champion within seconds.")
    try:
        await registry_call(request, promote, request.app.state.model_name, str(version))
    except MlflowException as error:
        raise registry_refusal(error, f"No version {version} to promote.") from error
    return RedirectResponse(f"{PREFIX}/models?promoted={version}", status_code=303)


@router.post("/models/rollback", dependencies=[Csrf])
async def roll_back(request: Request, caller: Admin, sure: Annotated[bool, Form()] = False) -> Response:
    if not sure:
        raise PageError(400, "Tick the box to confirm the rollback.")
    try:
        version = await registry_call(request, rollback, request.app.state.model_name)
    except LookupError as error:
        raise PageError(409, str(error)) from error
    except MlflowException as error:
        raise registry_refusal(error, "The registry refused the rollback.") from error
    return RedirectResponse(f"{PREFIX}/models?restored={version}", status_code=303)


# Every page's route, for the request metrics' labels (a path with an id in it is labelled by its prefix)
ROUTES = {PREFIX, *(PREFIX + route.path for route in router.routes if "{" not in route.path)}
