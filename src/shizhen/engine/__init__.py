"""The inference engine: the step loop in its own process (core, core_process) and the API process's client; loading,
prompt building, sampling. Knows nothing of HTTP."""
