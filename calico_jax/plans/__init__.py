"""AOT plans: compile targets, the roofline, train and predict plans, the search, the dry run."""
