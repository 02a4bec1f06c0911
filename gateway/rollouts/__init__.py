"""Traffic and rollouts: the pure traffic policy, the evidence recorder, shadow dispatch, the
rollout controller and the operations the admin API and the CLI share."""
