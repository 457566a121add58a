"""Several devices and processes: the mesh and its logical-axis rules, the job launcher, process agreements."""
