"""The gateway app's lifespan: start-up objects are frozen out of the collector while serving."""

from __future__ import annotations

import gc

from bots.gateway import create_app


async def _ready() -> dict[str, str]:
    return {}


async def test_serving_freezes_start_up_objects_and_shutdown_restores_the_collector() -> None:
    before = gc.get_threshold()
    app = create_app(channels=[], ready=_ready)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 1000  # modules, classes: everything loaded so far
        assert gc.get_threshold()[0] > before[0]
        gc.collect()  # a full collection no longer walks them
        assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
