"""The scheduler: the pure ``decide`` (:mod:`.decide`) and the service that runs it."""
