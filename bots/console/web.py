"""The console's routes: pages (HTML forms, POST-redirect-GET) and a small JSON API.

Without a signed-in operator every page redirects to the sign-in page and every /console/api
URL answers 401. Every POST needs the form's CSRF token (403 without it). Reviewers review
and correct; promoting, rolling back, forgetting people and managing operators need an
admin (403 otherwise). Every action is audited with the operator's identity (`console:NAME`).
"""

import hashlib
import json
import logging
import mimetypes
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bots.console.auth import Auth, Who
from bots.console.charts import bar_chart, legend, line_chart
from bots.console.curves import loss_curves
from bots.console.ops import Operations
from bots.core.handoff import HandoffDesk, HandoffPolicy
from storage import adapters, audit, operators, runs
from storage import console as store
from storage import handoff as handoff_store
from storage.feedback import UnknownAnswer, record_correction
from storage.models import AdapterStatus, Feedback, Message, TrainingRun

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
PREFIX = "/console"
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}
MAX_FORM_BYTES = 64 * 1024


def _fmt_time(when: datetime | None) -> str:
    if when is None:
        return "-"
    when = when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite's are naive UTC
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["t"] = _fmt_time
templates.env.filters["ms"] = _fmt_ms
templates.env.globals["prefix"] = PREFIX


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    return {k: v[0] for k, v in parse_qs(body.decode(errors="replace"),
                                         keep_blank_values=True).items()}


def router(auth: Auth, sessions: async_sessionmaker[AsyncSession], ops: Operations
           ) -> APIRouter:
    r = APIRouter(prefix=PREFIX, include_in_schema=False)

    async def operator(request: Request) -> Who:
        who = await auth.identify(request)
        if who is None:
            if request.url.path.startswith(f"{PREFIX}/api/"):
                raise HTTPException(401, "sign in to the console first",
                                    headers={"WWW-Authenticate": "Cookie"})
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":
                target = f"{PREFIX}/review"
            raise HTTPException(303, headers={"Location": f"{PREFIX}/login?next={quote(target)}"})
        return who

    Signed = Annotated[Who, Depends(operator)]

    async def posted(request: Request, *, who: Signed) -> tuple[Who, dict[str, str]]:
        """A signed-in operator's form, with its CSRF token checked."""
        form = await _form(request)
        if not await auth.check_csrf(who, form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")
        return who, form

    Posted = Annotated[tuple[Who, dict[str, str]], Depends(posted)]

    def admin(who: Who) -> None:
        if not who.admin:
            raise HTTPException(403, "admins only")

    async def page(request: Request, who: Who, name: str, status: int = 200,
                   **context: Any) -> Response:
        counts = context.get("counts")
        if counts is None:
            async with sessions() as s:
                counts = await store.pending_counts(s)
        return templates.TemplateResponse(request, name, {
            "who": who, "pending_total": sum(counts.values()), "notice":
            request.query_params.get("notice", ""), **context}, status_code=status)

    def back(path: str, notice: str = "") -> RedirectResponse:
        sep = "&" if "?" in path else "?"
        return RedirectResponse(f"{path}{sep}{urlencode({'notice': notice})}" if notice else path,
                                status_code=303)

    # ---- sign-in ----

    async def login_page(request: Request, *, next: str, error: str = "",
                         status: int = 200) -> Response:
        nonce, csrf = await auth.login_form(request)
        response = templates.TemplateResponse(request, "login.html", {
            "who": None, "next": next, "error": error, "csrf": csrf}, status_code=status)
        auth.set_login_cookie(request, response, nonce)
        return response

    @r.get("/login")
    async def login_get(request: Request, next: str = "") -> Response:
        return await login_page(request, next=next)

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        if not await auth.check_login_token(request, form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the sign-in page")
        name, password = form.get("name", "").strip(), form.get("password", "")
        nxt = form.get("next", "")
        address = request.client.host if request.client else "?"
        keys = (f"address:{address}", f"name:{name.lower()}")
        wait = auth.limiter.retry_after(*keys)
        error, status = "", 200
        if wait > 0:
            error, status = f"Too many failed sign-ins: try again in {wait:.0f} s.", 429
        else:
            async with sessions() as s:
                op = await operators.check_password(s, name=name, password=password)
            if op is not None and op.id is not None:
                target = nxt if nxt.startswith(f"{PREFIX}/") and "//" not in nxt else \
                    f"{PREFIX}/review"
                response = RedirectResponse(target, status_code=303)
                await auth.sign_in(response, request, op.id)
                log.info("console: %s signed in", op.name)
                return response
            auth.limiter.failed(*keys)
            error, status = "Wrong name or password.", 401
        return await login_page(request, next=nxt, error=error, status=status)

    @r.post("/logout")
    async def logout(posted: Posted) -> Response:
        who, _ = posted
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        await auth.sign_out(response, who)
        return response

    @r.get("/static/{name}")
    async def static(name: str) -> Response:
        path = STATIC.get(name)
        if path is None:
            raise HTTPException(404)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(path.read_bytes(), media_type=kind,
                        headers={"Cache-Control": "public, max-age=3600"})

    @r.get("")
    @r.get("/")
    async def home(who: Signed) -> Response:
        return RedirectResponse(f"{PREFIX}/review", status_code=303)

    # ---- review queue ----

    @r.get("/review")
    async def review(request: Request, channel: str = "", *, who: Signed
                     ) -> Response:
        async with sessions() as s:
            items = await store.review_queue(s, channel=channel or None)
            counts = await store.pending_counts(s)
        return await page(request, who, "review.html", items=items, counts=counts,
                          channel=channel)

    @r.post("/review/{feedback_id}")
    async def decide(request: Request, feedback_id: int,
                     posted: Posted) -> Response:
        who, form = posted
        action = form.get("action")
        if action not in ("approve", "reject"):
            raise HTTPException(400, "action is approve or reject")
        text = form.get("text", "").replace("\r\n", "\n")
        where = f"{PREFIX}/review" + (f"?channel={quote(form['channel'])}"
                                      if form.get("channel") else "")
        async with sessions() as s:
            edited = False
            if action == "approve" and text.strip():  # edited, then approved
                edited = await _edit_if_changed(s, feedback_id, text)
            try:
                await ops.decide(s, feedback_id, action == "approve", who.identity)
            except LookupError:
                return back(where, f"#{feedback_id} is no longer pending")
            if edited:
                await audit.log(s, actor=who.identity, action="edit",
                                target=f"feedback:{feedback_id}")
        return back(where, f"#{feedback_id} {'approved' if action == 'approve' else 'rejected'}"
                    + (" (edited)" if edited else ""))

    async def _edit_if_changed(s: Any, feedback_id: int, text: str) -> bool:
        stored = await s.get(Feedback, feedback_id)
        if stored is None or stored.correction == text:
            return False
        return await store.revise_pending(s, feedback_id=feedback_id, text=text)

    # ---- conversations ----

    def _filters(q: str, person: str, channel: str, adapter: str, rating: str, since: str,
                 until: str) -> store.Filters:
        def day(v: str) -> date | None:
            try:
                return date.fromisoformat(v) if v else None
            except ValueError:
                raise HTTPException(400, f"not a date (YYYY-MM-DD): {v!r}") from None

        return store.Filters(text=q.strip(), person=person.strip(), channel=channel.strip(),
                             adapter=adapter.strip(),
                             rating={"up": 1, "down": -1}.get(rating), since=day(since),
                             until=day(until))

    @r.get("/conversations")
    async def conversations(request: Request, q: str = "", person: str = "",
                            channel: str = "", adapter: str = "", rating: str = "",
                            since: str = "", until: str = "", before: int | None = None,
                            *, who: Signed) -> Response:
        filters = _filters(q, person, channel, adapter, rating, since, until)
        async with sessions() as s:
            found = await store.search_conversations(s, filters, before=before)
        params = {k: v for k, v in dict(q=q, person=person, channel=channel, adapter=adapter,
                                        rating=rating, since=since, until=until).items() if v}
        more = (urlencode({**params, "before": found[-1].id}) if len(found) == 50 else "")
        return await page(request, who, "conversations.html", found=found, f=params, more=more)

    @r.get("/conversations/{conversation_id}")
    async def conversation(request: Request, conversation_id: int,
                           *, who: Signed) -> Response:
        async with sessions() as s:
            found = await store.thread(s, conversation_id)
        if found is None:
            raise HTTPException(404, "no such conversation")
        return await page(request, who, "thread.html", t=found)

    @r.post("/answers/{answer_id}/correct")
    async def correct(answer_id: int, posted: Posted
                      ) -> Response:
        who, form = posted
        text = form.get("text", "").replace("\r\n", "\n").strip()
        if not text:
            raise HTTPException(400, "a correction needs text")
        async with sessions() as s:
            answer = await s.get(Message, answer_id)
            try:
                stored = await record_correction(s, answer_id=answer_id, voter_id=who.identity,
                                                 text=text, source="console", trusted=True)
            except UnknownAnswer:
                raise HTTPException(404, "no such answer") from None
            await audit.log(s, actor=who.identity, action="correct",
                            target=f"feedback:{stored.feedback.id}",
                            detail={"answer": answer_id})
        conv = answer.conversation_id if answer is not None else 0
        return back(f"{PREFIX}/conversations/{conv}", "correction stored (trusted)")

    # ---- quality ----

    async def _quality(days: int) -> dict[str, Any]:
        days = max(1, min(days, 90))
        today = datetime.now(UTC).date()
        first = today - timedelta(days=days - 1)
        since = datetime(first.year, first.month, first.day, tzinfo=UTC)
        labels = [(first + timedelta(days=i)) for i in range(days)]
        async with sessions() as s:
            counts = await store.quality_counts(s, first=first)
            ttft, latency = await store.percentiles(s, Message.ttft_ms, Message.latency_ms,
                                                    since=since)
        by_adapter, by_channel = store.ratings_by_day(counts)
        volume, failures = store.answer_volume(counts)
        return dict(days=days, labels=labels, by_adapter=by_adapter, by_channel=by_channel,
                    volume=volume, failures=failures, ttft=ttft, latency=latency)

    def _rates(labels: list[date], rows: list[store.DayRating]
               ) -> tuple[dict[str, list[float | None]], dict[str, tuple[int, int]]]:
        index = {d: i for i, d in enumerate(labels)}
        series: dict[str, list[float | None]] = {}
        totals: dict[str, tuple[int, int]] = {}
        for row in rows:
            ys = series.setdefault(row.key, [None] * len(labels))
            if row.day in index and row.up + row.down:
                ys[index[row.day]] = row.up / (row.up + row.down)
            up, down = totals.get(row.key, (0, 0))
            totals[row.key] = (up + row.up, down + row.down)
        return series, totals

    @r.get("/quality")
    async def quality(request: Request, days: int = 14, *, who: Signed
                      ) -> Response:
        data = await _quality(days)
        labels = data["labels"]
        xs = [d.strftime("%m-%d") for d in labels]
        charts = {}
        for key in ("by_adapter", "by_channel"):
            series, totals = _rates(labels, data[key])
            charts[key] = dict(svg=line_chart(xs, series, y_max=1.0, percent=True,
                                              label=f"share of 👍 per day {key}"),
                               legend=legend(list(series)), totals=totals)
        vol = {v.day: v for v in data["volume"]}
        answers = [float(vol[d].answers) if d in vol else 0.0 for d in labels]
        failed = [float(vol[d].failed) if d in vol else 0.0 for d in labels]
        charts["volume"] = dict(svg=bar_chart(xs, answers, stacked=failed, width=1100,
                                              height=200, label="answers per day"))
        canary = await ops.canary()
        async with sessions() as s:  # answers after which the user asked for a person
            handoffs = await handoff_store.rates(
                s, since=datetime.now(UTC) - timedelta(days=data["days"]))
        return await page(request, who, "quality.html", d=data, charts=charts, canary=canary,
                          total_answers=int(sum(answers)), total_failed=int(sum(failed)),
                          handoffs={a or "base model": r for a, r in handoffs.items()})

    # ---- training ----

    @r.get("/training")
    async def training(request: Request, *, who: Signed) -> Response:
        async with sessions() as s:
            recent = await runs.recent_runs(s, limit=30)
            roles = await store.run_roles(s, [x.id for x in recent if x.id is not None])
            versions = await adapters.all_versions(s)
            state = await adapters.serving(s)
        return await page(request, who, "training.html", runs=recent, roles=roles,
                          versions=versions[::-1], state=state, S=AdapterStatus)

    @r.get("/training/runs/{run_id}")
    async def run_page(request: Request, run_id: int, who: Signed
                       ) -> Response:
        async with sessions() as s:
            found = await s.get(TrainingRun, run_id)
            roles = (await store.run_roles(s, [run_id])).get(run_id, {})
        if found is None:
            raise HTTPException(404, "no such run")
        curves = loss_curves(found.log_path)
        steps = max((len(c) for c in curves.values()), default=0)
        svg = None
        if steps:
            xs = [str(i + 1) for i in range(steps)]
            series = {name: [p[1] for p in c] + [None] * (steps - len(c))
                      for name, c in curves.items()}
            svg = line_chart(xs, series, label="training loss per step", width=1100,
                             height=260)
        return await page(request, who, "run.html", run=found, roles=roles, curve=svg,
                          curve_legend=legend(list(curves)),
                          metrics=json.dumps(found.metrics or {}, indent=1, sort_keys=True))

    async def _confirm(request: Request, who: Who, form: dict[str, str], *, title: str,
                       text: str) -> Response | None:
        """The confirmation page, unless this post confirms (confirm=yes)."""
        if form.get("confirm") == "yes":
            return None
        return await page(request, who, "confirm.html", title=title, text=text,
                          action=request.url.path,
                          fields={k: v for k, v in form.items() if k not in ("csrf", "confirm")})

    @r.post("/adapters/{name}/promote")
    async def promote(request: Request, name: str,
                      posted: Posted) -> Response:
        who, form = posted
        admin(who)
        async with sessions() as s:
            state = await adapters.serving(s)
        now = state.active.name if state.active else "the base model"
        asked = await _confirm(request, who, form, title=f"Promote {name}?",
                               text=f"{name} will answer every conversation; {now} is retired.")
        if asked is not None:
            return asked
        async with sessions() as s:
            try:
                await adapters.promote(s, name=name)
            except adapters.RegistryError as exc:
                return back(f"{PREFIX}/training", str(exc))
            await audit.log(s, actor=who.identity, action=audit.Action.PROMOTE,
                            target=f"adapter:{name}")
        return back(f"{PREFIX}/training", f"{name} is now active")

    @r.post("/adapters/rollback")
    async def rollback(request: Request, posted: Posted
                       ) -> Response:
        who, form = posted
        admin(who)
        async with sessions() as s:
            state = await adapters.serving(s)
        what = (f"the canary {state.canary.name} is rejected" if state.canary else
                f"the active adapter {state.active.name} is retired and its parent restored"
                if state.active else "nothing (no canary, no active adapter)")
        asked = await _confirm(request, who, form, title="Roll back?",
                               text=f"Rolling back: {what}.")
        if asked is not None:
            return asked
        async with sessions() as s:
            try:
                removed, active = await adapters.rollback(s)
            except adapters.RegistryError as exc:
                return back(f"{PREFIX}/training", str(exc))
            await audit.log(s, actor=who.identity, action=audit.Action.ROLLBACK,
                            target=f"adapter:{removed}", detail={"active": active})
        return back(f"{PREFIX}/training",
                    f"rolled back {removed}; active: {active or 'base model'}")

    # ---- the inbox: web chat conversations handed to a person ----

    # an operator is a trusted agent: their reply to the bot's last answer is an approved pair
    desk = HandoffDesk(sessions, HandoffPolicy(channels=frozenset({"web"})),
                       trusted=lambda _: True)

    @r.get("/inbox")
    async def inbox(request: Request, *, who: Signed) -> Response:
        return await page(request, who, "inbox.html", handoffs=await desk.inbox(["web"]))

    async def _web_handoff(handoff_id: int) -> Any:
        found = await desk.find(handoff_id)
        if found is None or found.channel != "web":
            raise HTTPException(404, "no such web hand-off")
        return found

    @r.get("/inbox/{handoff_id}")
    async def inbox_thread(request: Request, handoff_id: int, *, who: Signed) -> Response:
        h = await _web_handoff(handoff_id)
        return await page(request, who, "inbox_thread.html", h=h,
                          transcript=await desk.transcript(h, limit=20),
                          relayed=await desk.messages(handoff_id))

    @r.post("/inbox/{handoff_id}/reply")
    async def inbox_reply(handoff_id: int, posted: Posted) -> Response:
        who, form = posted
        text = form.get("text", "").replace("\r\n", "\n").strip()
        if not text:
            raise HTTPException(400, "a reply needs text")
        await _web_handoff(handoff_id)
        # one delivery per rendered form (its CSRF token and the messages it showed): a
        # form sent twice relays once
        form_id = hashlib.sha256(f"{form.get('csrf')}:{form.get('nonce')}".encode()).hexdigest()
        sent = await desk.agent_message(handoff_id, agent=who.identity, name=who.name,
                                        text=text, delivery=("console",
                                                             f"inbox:{handoff_id}:{form_id[:32]}"))
        return back(f"{PREFIX}/inbox/{handoff_id}",
                    "sent: the chat shows it" if sent else "not sent: handed back already")

    @r.post("/inbox/{handoff_id}/done")
    async def inbox_done(handoff_id: int, posted: Posted) -> Response:
        who, _ = posted
        await _web_handoff(handoff_id)
        done = await desk.hand_back(handoff_id, by=who.identity)
        return back(f"{PREFIX}/inbox", f"hand-off #{handoff_id} "
                    + ("handed back to the bot" if done else "was handed back already"))

    # ---- the answer memory (approved answers sent as they are or quoted in prompts) ----

    @r.get("/memory")
    async def memory_page(request: Request, *, who: Signed) -> Response:
        from storage import memory as answer_memory

        async with sessions() as s:
            entries = await answer_memory.entries(s)
        unserved = {e.id for e in entries if e.status == "active" and ops.served(e) is None}
        return await page(request, who, "memory.html", entries=entries, unserved=unserved)

    # ---- people (forget) and operators: admins ----

    @r.get("/people")
    async def people(request: Request, *, who: Signed) -> Response:
        admin(who)
        return await page(request, who, "people.html")

    @r.post("/people/forget")
    async def forget(request: Request, posted: Posted
                     ) -> Response:
        who, form = posted
        admin(who)
        identity = form.get("identity", "").strip()
        if ":" not in identity:
            return back(f"{PREFIX}/people", "give the person as channel:id")
        asked = await _confirm(request, who, form, title=f"Forget {identity}?",
                               text="Their messages, votes, corrections and dataset rows are "
                                    "deleted; adapters trained on them become tainted. This "
                                    "cannot be undone.")
        if asked is not None:
            return asked
        summary = await ops.forget(identity, who.identity)
        return back(f"{PREFIX}/people", summary)

    @r.get("/operators")
    async def operators_page(request: Request, *, who: Signed) -> Response:
        admin(who)
        async with sessions() as s:
            everyone = await operators.list_operators(s)
        return await page(request, who, "operators.html", operators=everyone, password=None)

    @r.post("/operators")
    async def operator_add(request: Request,
                           posted: Posted) -> Response:
        who, form = posted
        admin(who)
        name, role = form.get("name", "").strip(), form.get("role", "reviewer")
        password = operators.new_password()
        async with sessions() as s:
            try:
                await operators.add_operator(s, name=name, role=role, password=password)
            except operators.OperatorError as exc:
                return back(f"{PREFIX}/operators", str(exc))
            await audit.log(s, actor=who.identity, action="operator_add",
                            target=f"operator:{name}", detail={"role": role})
            everyone = await operators.list_operators(s)
        return await page(request, who, "operators.html", operators=everyone,
                          password=(name, password))

    @r.post("/operators/{name}/disable")
    async def operator_disable(name: str, posted: Posted
                               ) -> Response:
        who, _ = posted
        admin(who)
        async with sessions() as s:
            try:
                await operators.disable_operator(s, name)
            except operators.OperatorError as exc:
                return back(f"{PREFIX}/operators", str(exc))
            await audit.log(s, actor=who.identity, action="operator_disable",
                            target=f"operator:{name}")
        return back(f"{PREFIX}/operators", f"{name} disabled")

    @r.get("/audit")
    async def audit_page(request: Request, *, who: Signed) -> Response:
        async with sessions() as s:
            entries = await audit.recent(s, limit=200)
        return await page(request, who, "audit.html", entries=entries)

    # ---- JSON API ----

    @r.get("/api/queue")
    async def api_queue(channel: str = "", *, who: Signed) -> JSONResponse:
        async with sessions() as s:
            items = await store.review_queue(s, channel=channel or None)
            counts = await store.pending_counts(s)
        return JSONResponse({"counts": counts, "items": [
            {"feedback_id": i.feedback_id, "voter": i.voter_id, "channel": i.channel,
             "question": i.question, "answer": i.answer, "correction": i.correction,
             "adapter": i.adapter, "conversation_id": i.conversation_id} for i in items]})

    @r.get("/api/conversations")
    async def api_conversations(q: str = "", person: str = "", channel: str = "",
                                adapter: str = "", rating: str = "", since: str = "",
                                until: str = "", before: int | None = None,
                                *, who: Signed) -> JSONResponse:
        filters = _filters(q, person, channel, adapter, rating, since, until)
        async with sessions() as s:
            found = await store.search_conversations(s, filters, before=before)
        return JSONResponse([{"id": c.id, "channel": c.channel, "messages": c.messages,
                              "first_question": c.first_question, "up": c.up, "down": c.down,
                              "corrections": c.corrections,
                              "last_at": c.last_at.isoformat()} for c in found])

    @r.get("/api/quality")
    async def api_quality(days: int = 14, *, who: Signed) -> JSONResponse:
        data = await _quality(days)
        canary = await ops.canary()

        def rows(rs: list[store.DayRating]) -> list[dict[str, Any]]:
            return [{"day": x.day.isoformat(), "key": x.key, "up": x.up, "down": x.down}
                    for x in rs]

        return JSONResponse({
            "days": data["days"], "by_adapter": rows(data["by_adapter"]),
            "by_channel": rows(data["by_channel"]),
            "volume": [{"day": v.day.isoformat(), "answers": v.answers, "failed": v.failed}
                       for v in data["volume"]],
            "failures": data["failures"],
            "ttft_ms": {"n": data["ttft"].n, "p50": data["ttft"].p50, "p99": data["ttft"].p99},
            "latency_ms": {"n": data["latency"].n, "p50": data["latency"].p50,
                           "p99": data["latency"].p99},
            "canary": None if canary is None else {
                k: getattr(canary, k) for k in canary.__dataclass_fields__}})

    @r.get("/api/runs/{run_id}/curve")
    async def api_curve(run_id: int, *, who: Signed) -> JSONResponse:
        async with sessions() as s:
            found = await s.get(TrainingRun, run_id)
        if found is None:
            raise HTTPException(404, "no such run")
        return JSONResponse({k: [[st, v] for st, v in c]
                             for k, c in loss_curves(found.log_path).items()})

    return r
