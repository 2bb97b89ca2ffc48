"""``make bench``: the agent's figures, each beside a baseline measured in the same run
(``main`` runs them all; the other modules each measure one side)."""
