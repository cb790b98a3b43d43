-- Orthanc auto-routing: forward each chest radiograph Orthanc stores to xr-triage's DICOM node.
--
-- In orthanc.json:
--   "LuaScripts": [ "/etc/orthanc/route-to-xr-triage.lua" ],
--   "DicomModalities": { "xr-triage": [ "XRTRIAGE", "xr-host.example", 11112 ] }
-- and, so the node's results come back in: xr-triage's AE title among the modalities allowed to store
-- (it calls with dicom_node.ae_title), or "DicomAlwaysAllowStore": true.
--
-- Only CR and DX (for presentation) images are forwarded: xr-triage refuses other SOP classes, and its own
-- SR and Secondary Capture must never be routed back to it.

local XR_TRIAGE = 'xr-triage'  -- the name under DicomModalities
local FORWARDED = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,    -- CR Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Presentation
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if not FORWARDED[tags['SOPClassUID']] then
    return
  end
  local part = tags['BodyPartExamined']
  if part ~= nil and part ~= '' and string.upper(part) ~= 'CHEST' then
    return
  end
  -- An asynchronous job: Orthanc retries it and shows it under /jobs; storing is never held up.
  RestApiPost('/modalities/' .. XR_TRIAGE .. '/store',
              '{"Resources": ["' .. instanceId .. '"], "Asynchronous": true, "Priority": 0}')
end
