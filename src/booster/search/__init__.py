"""``booster search``: an attacker who tunes the attack (learning rate, epochs) with Optuna, scored on
validation prompts disjoint from the test prompts; the worst case found is then measured on the test
prompts beside the fixed attack. :mod:`.validation` picks the prompts, :mod:`.study` runs the trials,
:mod:`.history` writes the tables and the plot, :mod:`.plan` prices a search (``--dry-run``)."""
