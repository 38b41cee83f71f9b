"""Console access: sign-in, redirects and 401s without it, CSRF, roles, rate limit, expiry,
the SSO header from trusted proxies only, and every action audited by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from storage import audit
from storage.models import AdapterVersion, AuditLog, Operator, OperatorSession
from tests.console.conftest import (
    build_console,
    console_app,
    csrf_of,
    seed_history,
    sign_in,
)

PAGES = ["/console", "/console/", "/console/review", "/console/review?channel=telegram",
         "/console/conversations", "/console/conversations?q=open", "/console/conversations/1",
         "/console/quality", "/console/training", "/console/training/runs/1",
         "/console/people", "/console/operators", "/console/audit"]
APIS = ["/console/api/queue", "/console/api/conversations", "/console/api/quality",
        "/console/api/runs/1/curve"]
POSTS = ["/console/review/1", "/console/answers/1/correct", "/console/adapters/x/promote",
         "/console/adapters/rollback", "/console/people/forget", "/console/operators",
         "/console/operators/rob/disable", "/console/logout"]


async def test_without_sign_in_pages_redirect_and_the_api_answers_401(
        client: httpx.AsyncClient, sessions: Any) -> None:
    for url in PAGES:
        r = await client.get(url)
        assert r.status_code == 303, url
        assert r.headers["location"].startswith("/console/login?next=/console"), url
    for url in APIS:
        r = await client.get(url)
        assert r.status_code == 401, url
        assert "sign in" in r.json()["detail"]
    for url in POSTS:
        r = await client.post(url, data={"confirm": "yes", "action": "approve", "text": "x",
                                         "identity": "telegram:1", "name": "eve"})
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login"), url
    async with sessions() as s:  # nothing happened
        assert [e.action for e in await audit.recent(s)] == []
        assert (await s.execute(select(Operator).where(Operator.name == "eve"))).first() is None
    login = await client.get("/console/login")
    assert login.status_code == 200 and 'name="password"' in login.text
    assert (await client.get("/console/static/console.css")).status_code == 200


async def test_sign_in_sets_a_strict_httponly_cookie_and_pages_load(
        client: httpx.AsyncClient, sessions: Any, tmp_path: Path) -> None:
    await seed_history(sessions, tmp_path)
    r = await sign_in(client, "alice")
    assert r.status_code == 303 and r.headers["location"] == "/console/review"
    cookie = next(v for k, v in r.headers.multi_items()
                  if k == "set-cookie" and v.startswith("chatloop_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    for url in PAGES[2:]:
        r = await client.get(url, follow_redirects=True)
        assert r.status_code in (200, 404), (url, r.text[:500])
    quality = (await client.get("/console/api/quality")).json()
    assert quality["canary"]["canary"] == "chatloop-v2"
    assert quality["ttft_ms"]["n"] > 0 and quality["failures"]["timeout"] > 0
    run = (await client.get("/console/training")).text
    assert "chatloop-v2" in run and "Promote" in run
    curve = (await client.get("/console/api/runs/2/curve")).json()
    assert [len(curve["sft"]), len(curve["kto"])] == [24, 12]
    assert curve["sft"][0] == [1, 2.4]


async def test_a_wrong_password_or_form_without_csrf_is_refused(client: httpx.AsyncClient,
                                                                 sessions: Any) -> None:
    assert (await sign_in(client, "alice", "wrong")).status_code == 401
    page = await client.get("/console/login")
    r = await client.post("/console/login", data={"name": "alice",
                                                  "password": "alice-password-1"})
    assert r.status_code == 403  # no CSRF token
    assert "chatloop_console=" not in r.headers.get("set-cookie", "")
    assert csrf_of(page.text)
    assert (await sign_in(client, "alice")).status_code == 303
    for url in POSTS:
        r = await client.post(url, data={"confirm": "yes", "action": "reject", "name": "eve",
                                         "identity": "telegram:1", "text": "x"})
        assert r.status_code == 403, url
        assert "CSRF" in r.json()["detail"]
    r = await client.post("/console/operators", data={"csrf": "forged", "name": "eve"})
    assert r.status_code == 403
    async with sessions() as s:
        assert (await s.execute(select(Operator).where(Operator.name == "eve"))).first() is None


async def test_a_reviewer_sees_no_promote_and_a_forged_promote_is_403(
        client: httpx.AsyncClient, sessions: Any, tmp_path: Path) -> None:
    await seed_history(sessions, tmp_path)
    await sign_in(client, "rob")
    page = (await client.get("/console/training")).text
    assert "chatloop-v2" in page and "Promote" not in page and "Roll back" not in page
    token = csrf_of(page)
    for url in ("/console/adapters/chatloop-v2/promote", "/console/adapters/rollback"):
        r = await client.post(url, data={"csrf": token, "confirm": "yes"})
        assert r.status_code == 403, url
    for url in ("/console/people", "/console/operators"):
        assert (await client.get(url)).status_code == 403
    async with sessions() as s:
        v2 = (await s.execute(select(AdapterVersion).where(
            AdapterVersion.name == "chatloop-v2"))).scalar_one()
        assert v2.status == "canary"


async def test_an_admin_promotes_after_confirming_and_it_is_audited(
        client: httpx.AsyncClient, sessions: Any, tmp_path: Path) -> None:
    await seed_history(sessions, tmp_path)
    await sign_in(client, "alice")
    token = csrf_of((await client.get("/console/training")).text)
    asked = await client.post("/console/adapters/chatloop-v2/promote", data={"csrf": token})
    assert asked.status_code == 200 and "Promote chatloop-v2?" in asked.text
    async with sessions() as s:
        assert (await s.execute(select(AdapterVersion.status).where(
            AdapterVersion.name == "chatloop-v2"))).scalar_one() == "canary"
    done = await client.post("/console/adapters/chatloop-v2/promote",
                             data={"csrf": token, "confirm": "yes"})
    assert done.status_code == 303
    async with sessions() as s:
        status = dict((await s.execute(select(AdapterVersion.name, AdapterVersion.status))).all())
        [entry] = await audit.recent(s, action="promote")
    assert status == {"chatloop-v0": "retired", "chatloop-v2": "active"}
    assert (entry.actor, entry.target) == ("console:alice", "adapter:chatloop-v2")
    await client.post("/console/adapters/rollback", data={"csrf": token, "confirm": "yes"})
    async with sessions() as s:
        [entry] = await audit.recent(s, action="rollback")
        status = dict((await s.execute(select(AdapterVersion.name, AdapterVersion.status))).all())
    assert status == {"chatloop-v0": "active", "chatloop-v2": "retired"}
    assert entry.actor == "console:alice"


async def test_failed_sign_ins_are_rate_limited(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        assert (await sign_in(client, "alice", "guess")).status_code == 401
    r = await sign_in(client, "alice")  # the right password, too late
    assert r.status_code == 429 and "Too many" in r.text
    assert (await client.get("/console/review")).status_code == 303


async def test_sessions_expire_and_end_when_an_operator_is_disabled(
        client: httpx.AsyncClient, sessions: Any) -> None:
    await sign_in(client, "rob")
    assert (await client.get("/console/review")).status_code == 200
    async with sessions() as s:
        await s.execute(update(OperatorSession).values(expires_at=OperatorSession.created_at))
        await s.commit()
    assert (await client.get("/console/review")).status_code == 303
    await sign_in(client, "rob")
    assert (await client.get("/console/review")).status_code == 200
    admin = httpx.AsyncClient(transport=client._transport, base_url="http://console.test")
    async with admin:
        await sign_in(admin, "alice")
        token = csrf_of((await admin.get("/console/operators")).text)
        r = await admin.post("/console/operators/rob/disable", data={"csrf": token})
        assert r.status_code == 303
        added = await admin.post("/console/operators", data={"csrf": token, "name": "carol",
                                                             "role": "reviewer"})
        assert 'id="new-password"' in added.text
    assert (await client.get("/console/review")).status_code == 303
    assert (await sign_in(client, "rob")).status_code == 401
    async with sessions() as s:
        actions = [(e.actor, e.action, e.target) for e in
                   (await s.execute(select(AuditLog).order_by(AuditLog.id))).scalars()]
    assert actions == [("console:alice", "operator_disable", "operator:rob"),
                       ("console:alice", "operator_add", "operator:carol")]


@pytest.mark.parametrize("peer,named", [("10.1.2.3", True), ("192.0.2.10", False)])
async def test_the_sso_header_counts_only_from_a_trusted_proxy(
        sessions: Any, tmp_path: Path, console: Any, peer: str, named: bool) -> None:
    proxied = build_console(sessions, tmp_path, user_header="X-Forwarded-User",
                            trusted_proxies=["10.0.0.0/8"])
    transport = httpx.ASGITransport(app=console_app(proxied), client=(peer, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://c.test") as c:
        r = await c.get("/console/operators", headers={"X-Forwarded-User": "alice"})
        assert r.status_code == (200 if named else 303)
        if named:
            assert "alice · admin" in r.text
            token = csrf_of(r.text)
            r = await c.post("/console/operators/rob/disable", data={"csrf": token},
                             headers={"X-Forwarded-User": "alice"})
            assert r.status_code == 303
            r = await c.post("/console/operators/alice/disable", data={"csrf": "x"},
                             headers={"X-Forwarded-User": "alice"})
            assert r.status_code == 403
        r = await c.get("/console/review", headers={"X-Forwarded-User": "nobody"})
        assert r.status_code == 303
