"""One client session: the sans-IO core that decides, the Trio actor that runs it, the
client-event backlog, the in-order results sequencer and the registry of live sessions."""
