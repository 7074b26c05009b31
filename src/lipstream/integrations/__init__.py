"""lipstream as the face of other frameworks' voice agents. `local` runs sessions inside the agent's own
process and `source` says where an integration's session comes from (no extra dependency); the framework
packages (`pipecat`, `livekit`) need their extras (`lipstream[pipecat]`, `lipstream[livekit]`) and are
never imported by the rest of lipstream."""
