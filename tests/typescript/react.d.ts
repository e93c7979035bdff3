// The two React functions the README's useJob hook uses, so it is type-checked without installing
// React or its types (same signatures as @types/react).
declare module "react" {
  type SetStateAction<S> = S | ((prev: S) => S);
  export function useState<S>(initial: S | (() => S)): [S, (value: SetStateAction<S>) => void];
  export function useEffect(effect: () => void | (() => void), deps?: readonly unknown[]): void;
}
