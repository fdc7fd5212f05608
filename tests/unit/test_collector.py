"""The collector is off from the command's start to the first step, then on again with start-up's objects frozen;
a collector someone else turned off stays off."""

import gc

import pytest

from ftcluster import collector


@pytest.fixture
def restore_gc():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_held_until_released_then_on_with_what_lived_frozen(restore_gc):
    gc.enable()
    collector.hold()
    assert not gc.isenabled()
    survivor = [object() for _ in range(100)]
    collector.after_first_step()
    assert gc.isenabled() and gc.get_freeze_count() >= len(survivor)
    collector.release()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_collector_turned_off_elsewhere_stays_off(restore_gc):
    gc.disable()
    collector.hold()
    collector.after_first_step()
    assert not gc.isenabled()
    collector.release()
    assert not gc.isenabled()


def test_a_run_that_fails_before_its_first_step_turns_the_collector_back_on(restore_gc):
    gc.enable()
    collector.hold()
    collector.release()
    assert gc.isenabled()
