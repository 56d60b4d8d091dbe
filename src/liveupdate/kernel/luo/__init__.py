"""The Live Update Orchestrator: one lifecycle core (files and handlers, freeze with rollback,
the ``LUO`` KHO subtree) and a thin front end per uAPI generation."""
