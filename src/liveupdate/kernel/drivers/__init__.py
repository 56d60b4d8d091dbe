"""Drivers of the machine's hardware: PCI now; the IOMMU, VFIO and iommufd with their LUO
handlers next (issue #25)."""
