// Native files imported `with { type: "file" }` resolve to a path (embedded in the single binary).
declare module "*.so" {
  const path: string;
  export default path;
}
declare module "*/vmm-standin" {
  const path: string;
  export default path;
}
