"""The console in a real browser (Debian's chromium driven by Playwright): an operator signs
in and approves, by keyboard, a correction that came through the Telegram fake; it shows as
trusted. A reviewer has no promote button, and a forged promote is refused.

Screenshots of each page go to $CHATLOOP_CONSOLE_SCREENSHOTS (docs/console for the README)
or the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from storage import audit
from storage.feedback import record_correction
from storage.models import Conversation, Feedback, Message
from tests.console.conftest import (
    PASSWORDS,
    add_operators,
    build_console,
    console_app,
    seed_history,
)
from tests.fakes.servers import serve_app
from tests.telegram.conftest import eventually

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # .ci/run installs it


async def _telegram_correction(bot: Any) -> None:
    chat = bot.fake.private()
    bot.fake.say(chat, "When do you open?")
    [answer] = await eventually(lambda: bot.fake.answers(chat["id"]))
    _, down = (b["callback_data"] for b in answer["reply_markup"]["inline_keyboard"][0])
    bot.fake.press(answer, down)
    prompt = await eventually(lambda: [m for m in bot.fake.sent(chat["id"])
                                       if "better one" in m["text"]])
    bot.fake.say(chat, "We open at eight, Monday to Saturday.", reply_to=prompt[0])
    await eventually(lambda: bot.fake.sent(chat["id"])[-1]["text"].startswith("Thanks!"))


async def _more_pending(sessions: Any) -> None:
    """Two pending corrections from Slack users on seeded answers (for a fuller queue)."""
    async with sessions() as s:
        answers = (await s.execute(select(Message.id).join(
            Conversation, Conversation.id == Message.conversation_id).where(
            Conversation.channel == "slack", Message.role == "assistant",
            Message.status == "ok").order_by(Message.id).limit(2))).scalars().all()
        for aid, text in zip(answers, ["You can reset it under Settings → Security.",
                                       "Yes, to Canada in 5-7 working days."], strict=True):
            await record_correction(s, answer_id=aid, voter_id="slack:T0/U7", text=text,
                                    source="slack", trusted=False)


def _shots(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("CHATLOOP_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_an_operator_approves_a_telegram_correction_in_the_browser(
        start_bot: Any, sessions: Any, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    shots = _shots(tmp_path)
    await seed_history(sessions, tmp_path)
    await _more_pending(sessions)
    bot = await start_bot()
    await _telegram_correction(bot)
    await add_operators(sessions)
    console = build_console(sessions, tmp_path)
    async with serve_app(console_app(console)) as url, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM,
                                           args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{url}/console/review")
            assert "/console/login" in page.url  # not signed in
            await page.screenshot(path=shots / "login.png")
            await page.fill("#name", "alice")
            await page.fill("#password", PASSWORDS["alice"])
            await page.click("button[type=submit]")
            await page.wait_for_url("**/console/review")
            telegram = page.locator("section.item", has_text="telegram:42")
            await telegram.wait_for()
            assert await telegram.locator("textarea").input_value() == (
                "We open at eight, Monday to Saturday.")
            assert await page.locator("[data-channel=telegram] b").inner_text() == "1"
            assert await page.locator("#pending-total").inner_text() == "3"
            await page.screenshot(path=shots / "review.png", full_page=True)

            await telegram.click()  # the current item; then the keyboard shortcut approves
            await page.keyboard.press("a")
            await page.wait_for_selector(".notice")
            assert "approved" in await page.locator(".notice").inner_text()
            assert await page.locator("#pending-total").inner_text() == "2"
            async with sessions() as s:
                fb = (await s.execute(select(Feedback).where(
                    Feedback.voter_id == "telegram:42", Feedback.correction.is_not(None))
                    .execution_options(populate_existing=True))).scalar_one()
                [entry] = await audit.recent(s, action="approve")
            assert fb.review_status == "approved"
            assert (entry.actor, entry.target) == ("console:alice", f"feedback:{fb.id}")

            await page.goto(f"{url}/console/conversations?person=telegram:42")
            await page.screenshot(path=shots / "conversations.png", full_page=True)
            await page.locator("table a").first.click()
            correction = page.locator(".correction", has_text="We open at eight")
            await correction.wait_for()
            assert (await correction.locator(".pill.trusted").text_content()) == "trusted"
            await page.screenshot(path=shots / "thread.png", full_page=True)

            for name in ("quality", "training", "training/runs/2", "memory", "audit"):
                await page.goto(f"{url}/console/{name}")
                await page.screenshot(path=shots / f"{name.replace('/', '-')}.png",
                                      full_page=True)
            assert await page.locator("#canary-decision").count() == 0  # on training
            phone = await browser.new_page(viewport={"width": 390, "height": 844},
                                           is_mobile=True, device_scale_factor=2)
            await phone.context.add_cookies(await page.context.cookies())
            for name in ("review", "quality"):
                await phone.goto(f"{url}/console/{name}")
                await phone.screenshot(path=shots / f"phone-{name}.png", full_page=True)

            # a reviewer: no promote button, and a forged promote is refused
            reviewer = await browser.new_page()
            await reviewer.goto(f"{url}/console/login")
            await reviewer.fill("#name", "rob")
            await reviewer.fill("#password", PASSWORDS["rob"])
            await reviewer.click("button[type=submit]")
            await reviewer.wait_for_url("**/console/review")
            await reviewer.goto(f"{url}/console/training")
            assert await reviewer.locator("text=chatloop-v2").count() > 0
            assert await reviewer.locator("button.promote").count() == 0
            assert await reviewer.locator("#rollback").count() == 0
            token = await reviewer.locator("input[name=csrf]").first.get_attribute("value")
            forged = await reviewer.request.post(
                f"{url}/console/adapters/chatloop-v2/promote",
                form={"csrf": token or "", "confirm": "yes"})
            assert forged.status == 403
        finally:
            await browser.close()
