"""Expert offloading: host store, device pool, budget, policies and the planning scheduler.

Mechanism (store, cache, budget) is kept apart from policy (policies, scheduler): the
scheduler is pure planning code that the engine carries out.
"""
