"""iommufd: ``/dev/iommu`` (IOAS, HWPT, bound devices) over the Intel IOMMU driver's tables."""
