"""Several instances on one Redis: the relay (jobs and answers that cross instances), session
and node ownership with fencing, and the session journal that makes a session resumable."""
