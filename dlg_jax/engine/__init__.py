"""One engine for every attack: a case (model + client) and an attack (labels, dummy, objective, solver, rules)
become per-lane pure functions (`attack.py`), run in lanes on every local device (`lanes.py`), fed by a host
scheduler that refills finished lanes (`scheduler.py`). One attack is one lane (`single.py`)."""
