"""The service's entry to the one recogniser of personal data in free text (e-mail addresses, phone numbers).

The recogniser is a pure text function and lives in ``model.personal_data``: the text model masks the decline texts
it reads with it (``model.textmodel.document``), and ``model`` imports nothing of the service. The service's log
scrubber, stored columns (``service.executor.store.MaskedText``), outcomes and history export mask with the same
functions, imported from here.
"""

from __future__ import annotations

from model.personal_data import DIGIT_RUN, SUSPECT, mask_address, mask_addresses_in, mask_personal_data

__all__ = ["DIGIT_RUN", "SUSPECT", "mask_address", "mask_addresses_in", "mask_personal_data"]
