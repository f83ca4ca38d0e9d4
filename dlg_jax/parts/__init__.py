"""The attack's parts, one concept a module: objectives (distances and priors), dummies (how the unknowns are
parametrised), labels (what the shared gradient says about them) and attempts (the rules every driver follows)."""
