"""The fleet collector: stores what a fleet of agents publishes, once, with gaps and
verified OCMF documents (``evse-collector``)."""
