"""The offline quality tool-chain: evaluation and scorecards, live quality from reviewer
feedback, disagreements, the operational report and decision-log reading and export. Heavy
dependencies (statsmodels, matplotlib, pyarrow) live here; the server never imports it."""
