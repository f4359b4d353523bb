#include "daemon/convert.h"

#include <algorithm>

#include <ctime>

#include "daemon/resources.h"
#include "state/object_store.h"

namespace regdisk::daemon {

namespace c = controller;

namespace {

c::Labels LabelsOf(const json& meta, const char* field = "labels") {
  c::Labels out;
  if (!meta.is_object() || !meta.contains(field) || !meta[field].is_object()) return out;
  for (const auto& [k, v] : meta[field].items()) {
    if (v.is_string()) out[k] = v.get<std::string>();
  }
  return out;
}

const json& Field(const json& j, const char* name) {
  static const json kNull;
  return j.is_object() && j.contains(name) ? j[name] : kNull;
}

std::string StringField(const json& j, const char* name) {
  const json& v = Field(j, name);
  return v.is_string() ? v.get<std::string>() : std::string();
}

std::optional<c::OwnerReference> ControllerRef(const json& meta) {
  const json& refs = Field(meta, "ownerReferences");
  if (!refs.is_array()) return std::nullopt;
  for (const auto& r : refs) {
    if (!r.is_object() || !r.value("controller", false)) continue;
    c::OwnerReference ref;
    ref.api_version = StringField(r, "apiVersion");
    ref.kind = StringField(r, "kind");
    ref.name = StringField(r, "name");
    ref.uid = StringField(r, "uid");
    ref.controller = true;
    ref.block_owner_deletion = r.value("blockOwnerDeletion", false);
    return ref;
  }
  return std::nullopt;
}

std::vector<c::Condition> ConditionsOf(const json& status) {
  std::vector<c::Condition> out;
  const json& conds = Field(status, "conditions");
  if (!conds.is_array()) return out;
  for (const auto& j : conds) {
    c::Condition cond;
    cond.type = StringField(j, "type");
    cond.status = StringField(j, "status");
    cond.reason = StringField(j, "reason");
    cond.message = StringField(j, "message");
    cond.last_transition_seconds = ParseTimestamp(StringField(j, "lastTransitionTime")).value_or(0);
    out.push_back(std::move(cond));
  }
  return out;
}

json ConditionsJson(const std::vector<c::Condition>& conds) {
  json out = json::array();
  for (const auto& cond : conds) {
    json j = {{"type", cond.type}, {"status", cond.status},
              {"lastTransitionTime", state::FormatTimestamp(cond.last_transition_seconds)}};
    if (!cond.reason.empty()) j["reason"] = cond.reason;
    if (!cond.message.empty()) j["message"] = cond.message;
    out.push_back(std::move(j));
  }
  return out;
}

bool ConditionTrue(const json& status, const char* type) {
  const json& conds = Field(status, "conditions");
  if (!conds.is_array()) return false;
  for (const auto& j : conds) {
    if (StringField(j, "type") == type) return StringField(j, "status") == "True";
  }
  return false;
}

c::VmiPhase PhaseOf(const std::string& name) {
  for (auto p : {c::VmiPhase::kPending, c::VmiPhase::kScheduling, c::VmiPhase::kScheduled, c::VmiPhase::kRunning,
                 c::VmiPhase::kSucceeded, c::VmiPhase::kFailed}) {
    if (c::PhaseName(p) == name) return p;
  }
  return name.empty() ? c::VmiPhase::kPending : c::VmiPhase::kUnknown;
}

c::VmiTemplate TemplateOf(const json& owner_spec, int64_t generation) {
  c::VmiTemplate t;
  const json& meta = Field(Field(owner_spec, "template"), "metadata");
  t.labels = LabelsOf(meta);
  t.annotations = LabelsOf(meta, "annotations");
  t.generation = generation;
  return t;
}

}  // namespace

bool IsV1alpha1(const json& object) { return StringField(object, "apiVersion") == "kubevirt.io/v1alpha1"; }

std::string_view InstanceResourceOf(const json& object) {
  return IsV1alpha1(object) ? kV1alpha1VmResource : kVmiResource;
}

std::string_view ReplicaSetResourceOf(const json& object) {
  return IsV1alpha1(object) ? kV1alpha1VmrsResource : kVmirsResource;
}

std::optional<int64_t> ParseTimestamp(const std::string& text) {
  std::tm tm{};
  const char* end = ::strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (end == nullptr || *end != '\0') return std::nullopt;
  return static_cast<int64_t>(::timegm(&tm));
}

c::ObservedVmi ObservedVmiFromJson(const json& vmi) {
  const json& meta = Field(vmi, "metadata");
  const json& status = Field(vmi, "status");
  c::ObservedVmi o;
  o.namespace_ = StringField(meta, "namespace");
  if (o.namespace_.empty()) o.namespace_ = "default";
  o.name = StringField(meta, "name");
  o.uid = StringField(meta, "uid");
  o.labels = LabelsOf(meta);
  o.controller_ref = ControllerRef(meta);
  o.phase = PhaseOf(StringField(status, "phase"));
  o.ready = ConditionTrue(status, "Ready");
  o.paused = ConditionTrue(status, "Paused");
  o.created.seconds = ParseTimestamp(StringField(meta, "creationTimestamp")).value_or(0);
  o.deletion_requested = Field(meta, "deletionTimestamp").is_string();
  const json& ann = Field(meta, "annotations");
  const std::string gen = StringField(ann, kTemplateGenerationAnnotation);
  o.template_generation = gen.empty() ? 0 : std::strtoll(gen.c_str(), nullptr, 10);
  return o;
}

Result<c::ReplicaSetState> ReplicaSetFromJson(const json& rs, int64_t now_seconds) {
  const json& meta = Field(rs, "metadata");
  const json& spec = Field(rs, "spec");
  c::ReplicaSetState s;
  s.api_version = StringField(rs, "apiVersion");
  s.kind = StringField(rs, "kind");
  s.namespace_ = StringField(meta, "namespace");
  if (s.namespace_.empty()) s.namespace_ = "default";
  s.name = StringField(meta, "name");
  s.uid = StringField(meta, "uid");
  const json& replicas = Field(spec, "replicas");
  s.replicas = replicas.is_number_integer() ? replicas.get<int>() : 1;
  const json& selector = Field(spec, "selector");
  if (Field(selector, "matchExpressions").is_array() && !Field(selector, "matchExpressions").empty()) {
    return Unimplemented("replica set " + s.name + ": selector.matchExpressions is not supported; use matchLabels");
  }
  s.match_labels = LabelsOf(selector, "matchLabels");
  if (!Field(spec, "template").is_object()) return InvalidArgument("replica set " + s.name + " has no spec.template");
  s.template_ = TemplateOf(spec, Field(meta, "generation").is_number_integer() ? meta["generation"].get<int64_t>() : 0);
  s.paused = Field(spec, "paused").is_boolean() && spec["paused"].get<bool>();
  s.deletion_requested = Field(meta, "deletionTimestamp").is_string();
  const json& status = Field(rs, "status");
  s.status.replicas = Field(status, "replicas").is_number_integer() ? status["replicas"].get<int>() : 0;
  s.status.ready_replicas = Field(status, "readyReplicas").is_number_integer() ? status["readyReplicas"].get<int>() : 0;
  s.status.label_selector = StringField(status, "labelSelector");
  s.status.conditions = ConditionsOf(status);
  s.now_seconds = now_seconds;
  return s;
}

Result<c::VmState> VmFromJson(const json& vm) {
  const json& meta = Field(vm, "metadata");
  const json& spec = Field(vm, "spec");
  c::VmState s;
  s.api_version = StringField(vm, "apiVersion");
  s.kind = StringField(vm, "kind");
  s.namespace_ = StringField(meta, "namespace");
  if (s.namespace_.empty()) s.namespace_ = "default";
  s.name = StringField(meta, "name");
  s.uid = StringField(meta, "uid");
  std::optional<bool> running;
  if (Field(spec, "running").is_boolean()) running = spec["running"].get<bool>();
  ASSIGN_OR_RETURN(s.run_strategy, c::EffectiveRunStrategy(running, StringField(spec, "runStrategy")));
  if (!Field(spec, "template").is_object()) return InvalidArgument("VirtualMachine " + s.name + " has no spec.template");
  s.template_ = TemplateOf(spec, Field(meta, "generation").is_number_integer() ? meta["generation"].get<int64_t>() : 0);
  s.deletion_requested = Field(meta, "deletionTimestamp").is_string();
  s.has_finalizer = HasFinalizer(vm, c::kVmControllerFinalizer);
  const json& status = Field(vm, "status");
  const json& requests = Field(status, "stateChangeRequests");
  if (requests.is_array()) {
    for (const auto& r : requests) {
      c::StateChangeRequest req;
      req.action = StringField(r, "action") == "Stop" ? c::StateChangeRequest::Action::kStop
                                                      : c::StateChangeRequest::Action::kStart;
      req.uid = StringField(Field(r, "data"), "uid");
      s.state_change_requests.push_back(req);
    }
  }
  s.status.printable_status = StringField(status, "printableStatus");
  s.status.created = Field(status, "created").is_boolean() && status["created"].get<bool>();
  s.status.ready = Field(status, "ready").is_boolean() && status["ready"].get<bool>();
  if (auto rs = StringField(status, "runStrategy"); !rs.empty()) s.status.run_strategy = c::ParseRunStrategy(rs);
  return s;
}

bool HasFinalizer(const json& object, std::string_view finalizer) {
  const json& list = Field(Field(object, "metadata"), "finalizers");
  if (!list.is_array()) return false;
  return std::any_of(list.begin(), list.end(), [&](const json& f) { return f.is_string() && f == finalizer; });
}

json WithoutFinalizer(json object, std::string_view finalizer) {
  if (!object.is_object() || !object.contains("metadata") || !object["metadata"].is_object()) return object;
  json& md = object["metadata"];
  if (!md.contains("finalizers") || !md["finalizers"].is_array()) return object;
  json kept = json::array();
  for (const auto& f : md["finalizers"]) {
    if (!(f.is_string() && f == finalizer)) kept.push_back(f);
  }
  if (kept.empty()) {
    md.erase("finalizers");
  } else {
    md["finalizers"] = kept;
  }
  return object;
}

json WithFinalizer(json object, std::string_view finalizer) {
  if (HasFinalizer(object, finalizer)) return object;
  json& list = object["metadata"]["finalizers"];
  if (!list.is_array()) list = json::array();
  list.push_back(finalizer);
  return object;
}

json OwnerReferenceJson(const c::OwnerReference& ref) {
  return {{"apiVersion", ref.api_version}, {"kind", ref.kind}, {"name", ref.name}, {"uid", ref.uid},
          {"controller", ref.controller}, {"blockOwnerDeletion", ref.block_owner_deletion}};
}

json VmiFromTemplate(const json& owner, const c::CreateVmi& action) {
  const json& tmpl = Field(Field(owner, "spec"), "template");
  json meta = json::object();
  meta["name"] = action.name;
  meta["namespace"] = action.namespace_;
  json labels = json::object();
  for (const auto& [k, v] : action.labels) labels[k] = v;
  if (!labels.empty()) meta["labels"] = labels;
  json annotations = json::object();
  for (const auto& [k, v] : action.template_.annotations) annotations[k] = v;
  annotations[kTemplateGenerationAnnotation] = std::to_string(action.template_.generation);
  meta["annotations"] = annotations;
  meta["ownerReferences"] = json::array({OwnerReferenceJson(action.owner)});
  // As KubeVirt's admission webhook puts it on every new VMI.
  meta["finalizers"] = json::array({c::kVmiFinalizer});
  // A v1alpha1 replica set makes v1alpha1 VirtualMachines (its template's
  // spec is in that generation's shape).
  json vmi = IsV1alpha1(owner)
                 ? json{{"apiVersion", "kubevirt.io/v1alpha1"}, {"kind", "VirtualMachine"}, {"metadata", meta}}
                 : json{{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"}, {"metadata", meta}};
  vmi["spec"] = Field(tmpl, "spec").is_object() ? tmpl["spec"] : json::object();
  return vmi;
}

json ReplicaSetStatusJson(const c::ReplicaSetStatus& status, json old_status) {
  if (!old_status.is_object()) old_status = json::object();
  old_status["replicas"] = status.replicas;
  old_status["readyReplicas"] = status.ready_replicas;
  old_status["labelSelector"] = status.label_selector;
  if (status.conditions.empty()) {
    old_status.erase("conditions");
  } else {
    old_status["conditions"] = ConditionsJson(status.conditions);
  }
  return old_status;
}

json VmStatusJson(const c::VmStatus& status, json old_status) {
  if (!old_status.is_object()) old_status = json::object();
  old_status["printableStatus"] = status.printable_status;
  old_status["created"] = status.created;
  old_status["ready"] = status.ready;
  if (status.run_strategy) {
    old_status["runStrategy"] = std::string(c::RunStrategyName(*status.run_strategy));
  } else {
    old_status.erase("runStrategy");
  }
  return old_status;
}

}  // namespace regdisk::daemon
