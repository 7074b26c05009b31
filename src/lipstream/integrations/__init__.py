"""lipstream as the face of other frameworks' voice agents. `local` runs sessions inside the agent's own
process (no extra dependency); the framework modules (`pipecat`) need their extras (`lipstream[pipecat]`)
and are never imported by the rest of lipstream."""
